"""mio.train"""
