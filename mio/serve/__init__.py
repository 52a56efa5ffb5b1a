"""mio.serve: `mio serve MODEL_DIR`, an OpenAI-compatible server over a model folder.

app      the FastAPI app: the endpoints, OpenAI's error objects, the API key and body-size guard
engine   the model's thread: jobs, the bounded queue, tickets the web side awaits; media rendering
answer   an answer as pieces of text, images and speech, whole or streamed
schemas  the request bodies (OpenAI's fields and mio's own extra fields)
limits   what a request may ask (body, pixels, seconds, n, queue) and the checks of its media
page     the chat page at /
cli      `mio serve`
"""
