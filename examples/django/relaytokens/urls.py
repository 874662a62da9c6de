from django.urls import path

from . import views

urlpatterns = [
    path("tasks/<str:task_id>/relay-token", views.relay_token, name="relay-token"),
    path("admin/relay-token", views.admin_relay_token, name="admin-relay-token"),
]
