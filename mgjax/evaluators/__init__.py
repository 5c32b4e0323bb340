"""Evaluators: what a set of weights scores on the validation sets, one module each.

  val_loss           the validation loss of every val split (early stopping and the drift
                     guard read it; val_text's is the text-only conversations' loss)
  understanding      decoded exact-match accuracy on short checkable answers, its chance
                     level, and answers that wrongly hold a <h> prompt
  generation         asked for an image: a well-formed <h>...</h> prompt (format_rate), its
                     token F1 and exact match against the reference prompt
  generation_intent  generation requests and ordinary questions together: the precision
                     and recall of answering with a prompt exactly when an image is asked for

`config.evals` names the decoded evaluators a run uses, each with its settings and how often
it runs (`every`: steps; 0 runs it at the stage's start and on its result only). Every
decoded score comes with its 95% bootstrap interval over records (mgjax.stats) and the
per-answer values a paired comparison (compare.py) resamples. suite.Suite runs them for the
trainer; stage 2's comparison and the recipe study read what it reports.
"""

from mgjax.evaluators import generation, generation_intent, understanding

# The decoded evaluators, by the name config.evals uses.
DECODED = {module.NAME: module for module in (understanding, generation, generation_intent)}

# Decoded scores where a rise is a regression.
LOWER_IS_BETTER = frozenset().union(*(module.LOWER_IS_BETTER for module in DECODED.values()))
