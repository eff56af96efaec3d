"""Audio in and out: decoding references and encoding clips (``encoding``), and encoding a clip while it
grows, for a stream (``stream_encoding``)."""
