// SystemdNotifier: readiness, stopping, watchdog and status for `Type=notify` (sd_notify(3)).
//
// A datagram to `$NOTIFY_SOCKET` per message; no libsystemd needed.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOCore

public final class SystemdNotifier: Sendable {
    private let descriptor: CInt
    private let address: UnixAddress
    /// Half of `WATCHDOG_USEC`, when systemd asked this process for watchdog pings.
    public let watchdogInterval: TimeAmount?

    /// The notifier systemd asked for, or nil when `NOTIFY_SOCKET` is not set.
    public static func fromEnvironment() -> SystemdNotifier? {
        let environment = ProcessInfo.processInfo.environment
        guard let path = environment["NOTIFY_SOCKET"], !path.isEmpty else { return nil }
        var watchdog: TimeAmount?
        if let usec = environment["WATCHDOG_USEC"].flatMap(Int64.init), usec > 0,
            environment["WATCHDOG_PID"].flatMap(Int32.init).map({ $0 == getpid() }) ?? true
        {
            watchdog = .microseconds(usec / 2)
        }
        unsetenv("NOTIFY_SOCKET")
        return SystemdNotifier(path: path, watchdogInterval: watchdog)
    }

    private init?(path: String, watchdogInterval: TimeAmount?) {
        guard let address = UnixAddress(path, allowingAbstract: true) else { return nil }
        guard let fd = try? SystemCalls.socket(AF_UNIX, SOCK_DGRAM, nonBlocking: true) else { return nil }
        descriptor = fd
        self.address = address
        self.watchdogInterval = watchdogInterval
    }

    deinit { SystemCalls.close(descriptor) }

    /// Sends `state`, e.g. `READY=1` or `STATUS=...`; never blocks, never fails the caller.
    public func notify(_ state: String) {
        _ = try? SystemCalls.sendto(descriptor, Array(state.utf8), to: address)
    }
}
