'''python-dbusmock template for fieldsync's test harness (tests/src/netmock.rs).

The harness starts plain dbusmock processes under a staging bus name, loads this file
into them with AddTemplate, builds the NetworkManager or ModemManager objects with
AddObject, and only then takes the real name with RequestBusName. It adds two control
methods that stock dbusmock (0.28) lacks:

- SetProperties: changes several properties of one object and announces them in ONE
  org.freedesktop.DBus.Properties.PropertiesChanged from that object, the way
  NetworkManager and ModemManager batch their changes. dbusmock's own UpdateProperties
  would do that too, but fails on object-path values (PrimaryConnection).
- RequestBusName: takes a well-known name on the mock's connection, so a client that
  sees NetworkManager appear never finds it half built.
'''

import dbus
import dbus.service

import dbusmock
from dbusmock import MOCK_IFACE

# dbus-python releases a name when its BusName object is garbage-collected.
_names = []


def load(_mock, _parameters):
    '''No objects here: the harness adds them.'''


@dbus.service.method(MOCK_IFACE, in_signature='ssa{sv}', out_signature='')
def SetProperties(_self, path, interface, properties):
    '''Changes existing properties of the object at path and emits one PropertiesChanged.'''
    try:
        obj = dbusmock.get_object(path)
    except KeyError as e:
        raise dbus.exceptions.DBusException(
            f'no object {path}', name='org.freedesktop.DBus.Error.UnknownObject') from e
    current = obj.props.get(interface, {})
    unknown = [str(name) for name in properties if name not in current]
    if unknown:
        # A typo in the harness must fail loudly, not add a property no client reads.
        raise dbus.exceptions.DBusException(
            f'{path} has no {interface} properties {unknown}',
            name='org.freedesktop.DBus.Error.UnknownProperty')
    current.update(properties)
    obj.EmitSignal(dbus.PROPERTIES_IFACE, 'PropertiesChanged', 'sa{sv}as',
                   [interface, properties, dbus.Array([], signature='s')])


@dbus.service.method(MOCK_IFACE, in_signature='s', out_signature='')
def RequestBusName(self, name):
    '''Takes the well-known name (fails if someone else has it).'''
    _names.append(dbus.service.BusName(name, self.bus_name.get_bus(), do_not_queue=True))
