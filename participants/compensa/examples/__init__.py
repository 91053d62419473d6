"""The checkout example participants (inventory, fraud, payment, shipping), built
on the participant SDK only; users import the SDK, never these. The saga
definitions that call them ship beside them, in `DEFINITIONS_DIR`."""

from pathlib import Path

#: checkout.yaml and checkout-parallel.yaml: the sagas these participants serve
#: (installed with the package, so `compensa demo` runs from a wheel too).
DEFINITIONS_DIR = Path(__file__).resolve().parent / "definitions"
