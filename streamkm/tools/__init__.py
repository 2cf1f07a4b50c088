"""Tools around the daemon: the local broker, the demo, ``produce``, ``report`` and synthetic streams.

None of these run in the daemon's hot path; the daemon never imports them.
"""
