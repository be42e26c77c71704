"""fastdd.models"""
