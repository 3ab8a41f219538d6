"""Multi-site deployment on Flower's deployment engine: development certificates, run submission.

- :mod:`fedkd.deploy.certs`: a development CA, the SuperLink's TLS certificate and SuperNode
  authentication key pairs (``fedkd certs``).
- :mod:`fedkd.deploy.submit`: start a run on a SuperLink with ``flwr run`` and report its final
  status honestly (``fedkd submit``).
"""
