"""The pipeline's steps, one module per method (and one for pretraining): each step is a function of one typed
description built from its rule (:func:`ifcl.runtime.from_rule`), called by the rule's script. Which module runs
an experiment's steps is its method's declaration (:attr:`ifcl.registry.Method.steps`)."""
