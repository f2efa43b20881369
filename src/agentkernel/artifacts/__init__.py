"""Guest artifacts that every microVM needs: the kernel and the guest agent, built and cached."""
