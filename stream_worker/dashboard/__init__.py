"""The live dashboard: ``stream-worker dashboard`` serves a page of counts, thumbnails and health.

``live.py`` reads what the worker keeps in Redis; ``server.py`` serves it over HTTP with the page
in ``static/`` (uPlot vendored from npm in ``static/vendor/``, no CDN).
"""
