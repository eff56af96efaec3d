"""What makes a clip trustworthy and ready to use: finishing, word timestamps and captions, verification.

Each module does one job and imports torch only when it runs, so validation and dry runs stay light.
"""
