"""fastdd.evaluate"""
