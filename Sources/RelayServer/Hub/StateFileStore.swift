// StateFileStore: reading and atomically replacing `--state-file`.
//
// The file describes one moment: the relay consumes it on start (reads, then
// removes it) and writes a new one on a clean shutdown. A relay later killed
// therefore leaves no file, and the next start takes new epochs instead of
// claiming a numbering that lost events. A file that cannot be removed is
// never restored: restored on every start, it would hand out the same seq
// twice within one epoch.

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import NIOCore
import RelayHub

enum StateFileStore {
    enum Failure: Error, CustomStringConvertible {
        /// The state file's directory cannot take the file (checked before the relay serves).
        case directoryNotWritable(path: String, reason: String)
        case unreadable(path: String, SystemCallError)
        case notRemovable(path: String, SystemCallError)
        case damaged(path: String, reason: String)
        case write(path: String, SystemCallError)

        var description: String {
            switch self {
            case .directoryNotWritable(let path, let reason):
                return "--state-file \(path): the relay could not write its state there (\(reason))"
            case .unreadable(let path, let error): return "\(path): cannot read it (\(error))"
            case .notRemovable(let path, let error): return "\(path): cannot remove it after reading (\(error))"
            case .damaged(let path, let reason): return "\(path): damaged (\(reason))"
            case .write(let path, let error): return "\(path): \(error)"
            }
        }
    }

    /// Proves at start that shutdown will be able to write `path`, by creating and removing the
    /// temporary file it writes first: a read-only or foreign directory is found now, not at the
    /// first restart that loses every epoch.
    static func checkWritable(_ path: String) throws {
        let directory = Self.directory(of: path)
        let status: stat
        do {
            status = try SystemCalls.stat(directory)
        } catch {
            throw Failure.directoryNotWritable(path: path, reason: "\(error)")
        }
        guard (status.st_mode & S_IFMT) == S_IFDIR else {
            throw Failure.directoryNotWritable(path: path, reason: "\(directory) is not a directory")
        }
        if let existing = try? SystemCalls.lstat(path), (existing.st_mode & S_IFMT) == S_IFDIR {
            throw Failure.directoryNotWritable(path: path, reason: "it is a directory")
        }
        let probe = temporaryPath(for: path)
        do {
            SystemCalls.close(try SystemCalls.open(probe, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode: 0o600))
        } catch {
            throw Failure.directoryNotWritable(path: path, reason: "\(error)")
        }
        try? SystemCalls.unlink(probe)
    }

    /// The topics in `path`, and the file is removed. Nil when there is no file. Throws when the
    /// file cannot be read, decoded or removed: the caller then starts with new epochs.
    static func take(_ path: String) throws -> [TopicState]? {
        let data: [UInt8]
        do {
            let fd = try SystemCalls.open(path, O_RDONLY)
            defer { SystemCalls.close(fd) }
            data = try SystemCalls.readToEnd(fd, .path(path))
        } catch {
            if error.code == ENOENT, error.call == "open" { return nil }
            throw Failure.unreadable(path: path, error)
        }
        // Removed before it is believed: should that fail, the same numbering would be restored
        // at every start and two events would share a seq within one epoch.
        do {
            try SystemCalls.unlink(path)
        } catch {
            if error.code != ENOENT { throw Failure.notRemovable(path: path, error) }
        }
        do {
            return try StateFile.decode(ByteBuffer(bytes: data))
        } catch {
            throw Failure.damaged(path: path, reason: "\(error)")
        }
    }

    /// Writes to a temporary file beside `path`, syncs it, then renames it over `path`,
    /// so a crash leaves either the old state or the new one, never half of one.
    static func write(_ topics: [TopicState], to path: String) throws {
        let bytes = StateFile.encode(topics)
        let temporary = temporaryPath(for: path)
        let fd: CInt
        do {
            fd = try SystemCalls.open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW, mode: 0o600)
        } catch {
            throw Failure.write(path: path, error)
        }
        var failure: SystemCallError?
        do {
            let written = bytes.withUnsafeReadableBytes { raw in
                Result { () throws(SystemCallError) in try SystemCalls.writeAll(fd, raw, .path(temporary)) }
            }
            try written.get()
            try SystemCalls.fsync(fd, .path(temporary))
        } catch {
            failure = error
        }
        SystemCalls.close(fd)
        if failure == nil {
            do { try SystemCalls.rename(temporary, to: path) } catch { failure = error }
        }
        if let failure {
            try? SystemCalls.unlink(temporary)
            throw Failure.write(path: path, failure)
        }
        // The rename is durable only once the directory is synced too.
        if let directory = try? SystemCalls.open(Self.directory(of: path), O_RDONLY) {
            try? SystemCalls.fsync(directory)
            SystemCalls.close(directory)
        }
    }

    private static func temporaryPath(for path: String) -> String { path + ".tmp" }

    private static func directory(of path: String) -> String {
        let directory = (path as NSString).deletingLastPathComponent
        return directory.isEmpty ? "." : directory
    }
}
