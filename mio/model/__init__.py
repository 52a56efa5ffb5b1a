"""mio.model"""
