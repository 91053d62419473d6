"""The checkout example participants (inventory, fraud, payment, shipping), built
on the participant SDK only; users import the SDK, never these."""
