"""Evaluation of critics: single-choice questions (:mod:`vcritic.evaluate.scq`, in generative,
loglik and cloze modes) and open-ended questions scored by judges (:mod:`vcritic.evaluate.oeq`);
``jobs/evaluate.py`` runs both on a logged or exported critic."""
