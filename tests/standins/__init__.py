"""Small stand-in servers on 127.0.0.1 for the outside services (Hugging Face Hub, Telegram Bot API).

Why stand-ins and not mocks: the real client libraries run unmodified against them, so the tests exercise the exact
requests those libraries send (routes, encodings, headers) and the exact errors they raise on bad answers.
"""
