"""mio: any-to-any models over discrete multimodal tokens."""
