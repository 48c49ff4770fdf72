# Lets `pytest` import soho, data, train and evaluate from the repository root.
