"""fastdd.data"""
