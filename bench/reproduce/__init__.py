"""The Llama-2-7B reproduction of the papers' rows (llama2_7b.py); see README.md here."""
