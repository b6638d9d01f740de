"""Audio in: frames, and the sources that make them (files, microphones, stdin, network senders, synthetic streams)."""
