"""defectscope.model.zoo"""
