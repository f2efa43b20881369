"""Fakes that let the service run without a VM: a guest agent that speaks the real protocol
(guest.py), a backend that starts it (backend.py), and a data dir with a stand-in kernel and image
(home.py)."""
