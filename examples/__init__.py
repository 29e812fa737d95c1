"""Runnable examples of netsim providers: ``netsim.examples.<name>`` when installed (``netsim examples`` lists them),
``examples.<name>`` in a checkout (netsim/examples links here)."""
