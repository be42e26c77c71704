"""fastdd.augment"""
