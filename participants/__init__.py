"""Participant SDK and the checkout example participants."""
