"""Graph rewrites, one module per pass; :mod:`onnxsmith.optimizer.registry` names them for recipes."""
