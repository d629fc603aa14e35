"""Data sources: the Kaggle layout, splits and the embedded synthetic demo set (no TensorFlow here)."""
