import Foundation
import ProgressEmitter
import Testing

@Suite("ProgressEmitter against a real relay", .serialized)
struct ProgressEmitterTests {
    struct Step: Encodable {
        var i: Int
        var note: String
    }

    @Test("events arrive in order, exactly as emitted")
    func deliveryInOrder() throws {
        let relay = try RelayProcess()
        try relay.start()
        let emitter = ProgressEmitter(socketPath: relay.socketPath)
        for i in 0..<1000 {
            emitter.emit(topic: "order", type: "step", fields: Step(i: i, note: "é/\"\(i)\""))
        }
        #expect(emitter.flush(timeout: .seconds(10)))
        try relay.stop()
        let events = try relay.events(of: "order")
        #expect(events.map { $0["i"] as? Int } == (0..<1000).map { $0 })
        #expect(events.map { $0["seq"] as? Int } == (1...1000).map { $0 })
        #expect(events.first?["note"] as? String == "é/\"0\"")
        #expect(events.first?["type"] as? String == "step")
        #expect(emitter.writtenCount == 1000 && emitter.droppedCount == 0 && emitter.rejectedCount == 0)
    }

    @Test("events queued while the relay is absent arrive once it starts")
    func relayAbsentAtFirst() throws {
        let relay = try RelayProcess()
        let emitter = ProgressEmitter(socketPath: relay.socketPath)
        for i in 0..<100 { emitter.emit(topic: "late", fields: ["i": i]) }
        Thread.sleep(forTimeInterval: 0.3)
        #expect(emitter.writtenCount == 0)
        try relay.start()
        #expect(emitter.flush(timeout: .seconds(10)))
        try relay.stop()
        #expect(try relay.events(of: "late").map { $0["i"] as? Int } == (0..<100).map { $0 })
    }

    @Test("a relay restarted mid-stream loses nothing")
    func relayRestartedMidStream() throws {
        let relay = try RelayProcess()
        try relay.start()
        let emitter = ProgressEmitter(socketPath: relay.socketPath)
        for i in 0..<600 {
            emitter.emit(topic: "restart", fields: ["i": i])
            if i == 300 {
                try relay.stop()
                try relay.start()
            }
            if i % 20 == 0 { Thread.sleep(forTimeInterval: 0.002) }
        }
        #expect(emitter.flush(timeout: .seconds(15)))
        try relay.stop()
        let events = try relay.events(of: "restart")
        #expect(events.map { $0["i"] as? Int } == (0..<600).map { $0 })
        #expect(events.map { $0["seq"] as? Int } == (1...600).map { $0 })
    }

    @Test("a full queue drops the oldest events and counts them")
    func overflowCounted() throws {
        let relay = try RelayProcess()
        let emitter = ProgressEmitter(configuration: .init(socketPath: relay.socketPath, queueCapacity: 10))
        for i in 0..<100 { emitter.emit(topic: "overflow", fields: ["i": i]) }
        #expect(emitter.droppedCount == 90)
        try relay.start()
        #expect(emitter.flush(timeout: .seconds(10)))
        try relay.stop()
        #expect(try relay.events(of: "overflow").map { $0["i"] as? Int } == (90..<100).map { $0 })
    }

    @Test("fields that are not a JSON object are counted, not thrown")
    func unencodableFields() throws {
        let relay = try RelayProcess()
        let emitter = ProgressEmitter(socketPath: relay.socketPath)
        emitter.emit(topic: "bad", fields: [1, 2, 3])
        emitter.emit(topic: "bad", fields: ["x": Double.nan])
        #expect(emitter.failedCount == 2)
        emitter.close(timeout: .milliseconds(100))
        emitter.emit(topic: "bad", fields: ["after": "close"])
        #expect(emitter.droppedCount == 1)
    }

    @Test("lines the relay rejects are counted")
    func rejectedCounted() throws {
        let relay = try RelayProcess()
        try relay.start()
        let emitter = ProgressEmitter(socketPath: relay.socketPath)
        emitter.emit(topic: "not a topic", fields: ["i": 1])
        emitter.emit(topic: "fine", fields: ["op": "reserved"])
        emitter.emit(topic: "fine", fields: ["i": 2])
        #expect(emitter.flush(timeout: .seconds(10)))
        let deadline = Date(timeIntervalSinceNow: 5)
        while emitter.rejectedCount < 2, Date() < deadline {
            emitter.emit(topic: "fine", fields: ["poke": true])
            emitter.flush(timeout: .seconds(1))
            Thread.sleep(forTimeInterval: 0.05)
        }
        #expect(emitter.rejectedCount == 2)
        try relay.stop()
        #expect(try relay.events(of: "fine").first?["i"] as? Int == 2)
    }

    @Test("TaskProgress writes the contract's progress, complete and error events")
    func taskProgressEvents() throws {
        let relay = try RelayProcess()
        try relay.start()
        let emitter = ProgressEmitter(socketPath: relay.socketPath)
        let task = emitter.task(topic: "task:42")
        struct DiskFull: Error, CustomStringConvertible { var description: String { "no space left" } }
        task.progress(current: 3, total: 5, message: "three of five", status: "running")
        task.progress(current: 1, total: 3)
        task.complete(result: ["rows": 12])
        task.fail(error: "disk full", details: "while writing")
        task.fail(DiskFull())
        #expect(emitter.flush(timeout: .seconds(10)))
        try relay.stop()
        let events = try relay.events(of: "task:42")
        try #require(events.count == 5)
        #expect(events[0]["type"] as? String == "progress")
        #expect(events[0]["progress"] as? Double == 60)
        #expect(events[0]["current"] as? Int == 3 && events[0]["total"] as? Int == 5)
        #expect(events[0]["message"] as? String == "three of five" && events[0]["status"] as? String == "running")
        #expect(events[1]["progress"] as? Double == 33.3)
        #expect(events[1]["message"] as? String == "1/3" && events[1]["status"] as? String == "PROGRESS")
        #expect(events[2]["type"] as? String == "complete" && events[2]["success"] as? Bool == true)
        #expect(events[2]["message"] as? String == "done")
        #expect((events[2]["result"] as? [String: Any])?["rows"] as? Int == 12)
        #expect(events[3]["type"] as? String == "error" && events[3]["error"] as? String == "disk full")
        #expect(events[3]["details"] as? String == "while writing")
        #expect(events[4]["error"] as? String == "DiskFull: no space left")
        #expect((events[4]["details"] as? [String: Any])?["type"] as? String == "DiskFull")
    }

    @Test("emit is safe from many threads at once")
    func concurrentEmitters() async throws {
        let relay = try RelayProcess()
        try relay.start()
        let emitter = ProgressEmitter(socketPath: relay.socketPath)
        await withTaskGroup(of: Void.self) { group in
            for worker in 0..<8 {
                group.addTask {
                    for i in 0..<250 { emitter.emit(topic: "many:\(worker)", fields: ["i": i]) }
                }
            }
        }
        #expect(emitter.flush(timeout: .seconds(10)))
        try relay.stop()
        for worker in 0..<8 {
            #expect(try relay.events(of: "many:\(worker)").map { $0["i"] as? Int } == (0..<250).map { $0 })
        }
    }
}
