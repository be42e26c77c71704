"""Pure-torch reference implementations: the test oracle and the fallback when no kernel is compiled."""
