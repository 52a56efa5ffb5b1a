"""mio.generate"""
