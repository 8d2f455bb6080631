"""The file MLflow logs as the pyfunc model's code ("models from code", no pickling):
loading the model runs this module, which names the model class to serve."""

from mlflow.models import set_model

from esmm.serving import ESMMPyfunc

set_model(ESMMPyfunc())
