"""Answering with a trained run: the pieces `zhlora serve` and the other inference commands share.

    adapters.py  named LoRA adapters in one model: parse --adapters, attach them, switch between
                 them or to the base (demo, serve, evaluate and merge-adapters all go through it)
    engine.py    the one model and the one worker thread that generates for `zhlora serve`
    app.py       the HTTP side of `zhlora serve`: OpenAI-shaped routes, the chat page (zhlora/web/)
    schema.py    what a chat request may hold, and OpenAI's error shape for every refusal

The commands themselves stay one module each: zhlora/server.py (serve), chat.py (demo),
evaluate.py, merge.py. Imports run one way: server.py -> app.py -> engine.py -> adapters.py.
"""
