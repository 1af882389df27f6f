"""Evaluation code that is not serving: pruned-vs-full accuracy on the demo suite, and the paper's
router-logit matcher as a baseline to compare retrieval with.

``taer eval`` and ``taer bench`` import it when they run; nothing under ``expert_store/``,
``retrieval/`` or ``server/`` (apart from those two CLI entries) imports it.
"""
