"""mio.data"""
