"""The domain: settings, registry tables, artifact store, and (later) mixture layers, routers and losses.

Imports neither gradio, celery, worker nor app (tests/test_layering.py holds it to that).
"""
