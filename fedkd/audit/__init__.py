"""Empirical privacy audits of a run: membership inference and the one-run canary audit.

`mia` (loss threshold, offline LiRA), `canary` (Steinke et al. 2023's one-run bound; the
canaries themselves are in `fedkd.data.canaries`), `run_audit` (loading a run folder, writing
``audit.json``, the end-of-run audit hook).
"""
