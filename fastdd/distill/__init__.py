"""fastdd.distill"""
