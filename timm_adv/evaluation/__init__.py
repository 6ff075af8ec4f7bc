from .accuracy import evaluate_accuracy
