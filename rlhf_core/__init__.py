"""rlhf_core: the ML of the alignment pipeline.

Data formats and loaders, tokenizers and models, losses, RL math, trainers,
generation and evaluation. Imports torch/transformers/datasets/accelerate/peft
only -- never prefect, mlflow, dvc, great_expectations or boto3. Trainers report
through a ``log_fn(metrics, step)`` callback that ``tasks/`` connects to MLflow.
"""

__version__ = "0.1.0"
