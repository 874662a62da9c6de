// emitter-bench: what `ProgressEmitter.emit` costs the caller, with the relay gone
// and with a relay taking the events. Prints figures; asserts nothing.
//
//   swift run -c release emitter-bench [--events N] [--socket PATH]
//
// With --socket pointing at a running relay it also measures the second case.

import Foundation
import ProgressEmitter

struct Step: Encodable {
    var progress: Double
    var current: Int
    var total: Int
    var message: String
}

func measure(_ label: String, socket: String, events: Int, capacity: Int) {
    let emitter = ProgressEmitter(configuration: .init(socketPath: socket, queueCapacity: capacity))
    var worst: UInt64 = 0
    let start = DispatchTime.now().uptimeNanoseconds
    for i in 0..<events {
        let before = DispatchTime.now().uptimeNanoseconds
        emitter.emit(topic: "bench", type: "progress", fields: Step(progress: Double(i % 100), current: i, total: events, message: "step \(i)"))
        worst = max(worst, DispatchTime.now().uptimeNanoseconds - before)
    }
    let elapsed = DispatchTime.now().uptimeNanoseconds - start
    let flushed = emitter.flush(timeout: .seconds(10))
    print(
        "\(label): \(events) emits, \(String(format: "%.2f", Double(elapsed) / Double(events) / 1000)) µs each on average, "
            + "slowest \(String(format: "%.1f", Double(worst) / 1000)) µs; written \(emitter.writtenCount), "
            + "dropped \(emitter.droppedCount), flushed \(flushed)")
}

var events = 200_000
var socket: String?
var arguments = CommandLine.arguments.dropFirst().makeIterator()
while let argument = arguments.next() {
    switch argument {
    case "--events": events = arguments.next().flatMap(Int.init) ?? events
    case "--socket": socket = arguments.next()
    default:
        print("usage: emitter-bench [--events N] [--socket PATH]")
        exit(2)
    }
}

measure("relay gone", socket: "/nonexistent/progress.sock", events: events, capacity: 10_000)
if let socket {
    measure("relay running", socket: socket, events: events, capacity: 10_000)
}
