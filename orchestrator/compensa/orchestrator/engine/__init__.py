"""The engine: drives sagas through the pure state machine, writes transitions, calls participants."""
