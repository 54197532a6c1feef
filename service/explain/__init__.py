"""Explanations: the explainer and its admission, attribution methods, layer activations, the page's samples."""
