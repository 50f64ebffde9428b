"""Hugging Face in and out, and the only place ``transformers`` is imported: MoEfication of BERT-family encoders
(``moefy``), their checkpoint format, text feeds through a model's tokenizer, and the importers that turn a model
directory into a :class:`~pimoe_export.model.source.ModelSource`."""
