// A real relay process for the emitter's tests; what it published is read back from its state file.

import Foundation
import Testing

final class RelayProcess {
    let directory: URL
    let socketPath: String
    let statePath: String
    private var process: Process?

    static var binary: String {
        if let path = ProcessInfo.processInfo.environment["PROGRESS_RELAY_BIN"], !path.isEmpty { return path }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/progress-relay").path
    }

    init() throws {
        directory = URL(fileURLWithPath: "/tmp").appendingPathComponent("pe-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        socketPath = directory.appendingPathComponent("p.sock").path
        statePath = directory.appendingPathComponent("state").path
        try Data("emitter-tests-secret-0123456789abcdef".utf8).write(to: directory.appendingPathComponent("secret"))
        if let user = Self.unprivilegedUser {
            for path in [directory.path, directory.appendingPathComponent("secret").path] {
                try FileManager.default.setAttributes(
                    [.ownerAccountID: user, .groupOwnerAccountID: user], ofItemAtPath: path)
            }
        }
    }

    /// Run as root (as CI does), the relay runs as this unused uid and gid without capabilities,
    /// the way users run it; the end-to-end suite does the same (relaylib.RELAY_UID).
    static var unprivilegedUser: Int? { getuid() == 0 ? 61000 : nil }

    deinit {
        if let process, process.isRunning { process.terminate() }
        try? FileManager.default.removeItem(at: directory)
    }

    /// Starts the relay and waits until its socket accepts connections.
    func start() throws {
        try #require(FileManager.default.isExecutableFile(atPath: Self.binary), "no relay binary at \(Self.binary)")
        let process = Process()
        var prefix: [String] = []
        if let user = Self.unprivilegedUser {
            prefix = [
                "--reuid=\(user)", "--regid=\(user)", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
                "--no-new-privs", "--", Self.binary,
            ]
        }
        process.executableURL = URL(fileURLWithPath: prefix.isEmpty ? Self.binary : "/usr/bin/setpriv")
        process.arguments = prefix + [
            "serve", "--socket", socketPath, "--listen", "127.0.0.1:0", "--history", "100000",
            "--jwt-secret-file", directory.appendingPathComponent("secret").path, "--state-file", statePath,
            "--log-level", "warning",
        ]
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        self.process = process
        let deadline = Date(timeIntervalSinceNow: 15)
        while !FileManager.default.fileExists(atPath: socketPath) {
            try #require(process.isRunning, "the relay exited with \(process.terminationStatus)")
            try #require(Date() < deadline, "the relay did not bind its socket")
            Thread.sleep(forTimeInterval: 0.02)
        }
    }

    /// Stops the relay with SIGTERM: it publishes what it read, then writes its state.
    func stop() throws {
        guard let process else { return }
        process.terminate()
        process.waitUntilExit()
        self.process = nil
        #expect(process.terminationStatus == 0)
    }

    /// The events the relay holds for `topic`, oldest first, from the state file of its last stop.
    func events(of topic: String) throws -> [[String: Any]] {
        let text = try String(contentsOfFile: statePath, encoding: .utf8)
        var events: [[String: Any]] = []
        var current: String?
        for line in text.split(separator: "\n").dropFirst() {
            let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
            if object["seq"] == nil || object["epoch"] != nil {
                current = object["topic"] as? String
            } else if current == topic {
                events.append(object)
            }
        }
        return events
    }
}
