using System.Text.Json;
using UblkSharp.Runtime;

namespace UblkSharp.Tests.Runtime;

/// <summary>A recipe carries the daemon's version; one written before that still reads.</summary>
[System.Runtime.Versioning.SupportedOSPlatform("linux")]
public sealed class DeviceRecordTests : IDisposable
{
    private readonly DirectoryInfo _dir = Directory.CreateTempSubdirectory("ublksharp-record-");

    public void Dispose() => _dir.Delete(recursive: true);

    [Fact]
    public void TheVersionIsTheAssemblysInformationalVersion()
    {
        Assert.False(string.IsNullOrEmpty(DeviceRecord.CurrentVersion));
        Assert.NotEqual("unknown", DeviceRecord.CurrentVersion);
        Assert.StartsWith(typeof(DeviceRecord).Assembly.GetName().Version!.ToString(3), DeviceRecord.CurrentVersion, StringComparison.Ordinal);
    }

    [Fact]
    public void ARecordWithAVersionRoundTrips()
    {
        var record = new DeviceRecord { Id = 1, Pid = 10, Target = "null", Recipe = new() { ["size"] = "1048576" }, Queues = 1, Depth = 64, Size = 1 << 20, Version = "1.2.3+abc" };
        var text = record.ToJson();
        using (var doc = JsonDocument.Parse(text))
        {
            Assert.Equal("1.2.3+abc", doc.RootElement.GetProperty("version").GetString());
        }
        Assert.Equal("1.2.3+abc", DeviceRecord.Parse(text).Version);
    }

    [Fact]
    public void CrashSafetyAndReleaseAreWrittenOnlyWhenNotTheirDefaults()
    {
        var record = new DeviceRecord { Id = 1, Pid = 10, Target = "null", Recipe = new() { ["size"] = "1048576" }, Queues = 1, Depth = 64, Size = 1 << 20 };
        Assert.DoesNotContain("crashSafe", record.ToJson(), StringComparison.Ordinal);
        Assert.DoesNotContain("released", record.ToJson(), StringComparison.Ordinal);
        var cow = record with { CrashSafe = false };
        Assert.Contains("\"crashSafe\": false", cow.ToJson(), StringComparison.Ordinal);
        Assert.False(DeviceRecord.Parse(cow.ToJson()).CrashSafe);
        Assert.False(DeviceRecord.Parse(cow.ToJson()).Released);
        var released = cow with { Released = true };
        Assert.Contains("\"released\": true", released.ToJson(), StringComparison.Ordinal);
        Assert.True(DeviceRecord.Parse(released.ToJson()).Released);
        // A record of an older build has neither: crash-safe, not released.
        var old = DeviceRecord.Parse(record.ToJson());
        Assert.True(old.CrashSafe);
        Assert.False(old.Released);
    }

    [Fact]
    public void EveryMemberRoundTrips()
    {
        var record = new DeviceRecord
        {
            Id = 3,
            Pid = 4242,
            DaemonStartTime = 987654321,
            DaemonExecutable = "/usr/lib/dotnet/dotnet",
            Target = "cow",
            Recipe = new() { ["base"] = "/srv/b \"q\".img", ["overlay"] = "/srv/o.img", ["size"] = "1073741824" },
            Queues = 2,
            Depth = 64,
            Size = 1L << 30,
            MaxIoBytes = 1 << 20,
            Recovery = "reissue",
            Autoclear = true,
            SupervisorPid = 77,
            Created = new DateTimeOffset(2026, 12, 6, 21, 0, 0, 123, TimeSpan.Zero),
            Version = "0.9.0+deadbeef",
            CrashSafe = false,
            Released = true,
        };
        var back = DeviceRecord.Parse(record.ToJson());
        // A record's Recipe is a Dictionary: compare it apart from the rest.
        Assert.Equal(record.Recipe, back.Recipe);
        Assert.Equal(record with { Recipe = back.Recipe }, back);
    }

    [Fact]
    public void TheJsonIsWhatTheSerializerOfEarlierVersionsWrote()
    {
        // Member names, order and forms as System.Text.Json's source generator wrote them (camelCase,
        // indented, null where unset): tools that read the records see no change.
        var record = new DeviceRecord { Id = 1, Pid = 10, Target = "null", Recipe = new() { ["size"] = "1048576" }, Queues = 1, Depth = 64, Size = 1 << 20, Created = new DateTimeOffset(2026, 12, 1, 10, 0, 0, TimeSpan.Zero) };
        Assert.Equal("""
            {
              "id": 1,
              "pid": 10,
              "daemonStartTime": null,
              "daemonExecutable": null,
              "target": "null",
              "recipe": {
                "size": "1048576"
              },
              "queues": 1,
              "depth": 64,
              "size": 1048576,
              "maxIoBytes": 524288,
              "recovery": "off",
              "autoclear": false,
              "supervisorPid": 0,
              "created": "2026-12-01T10:00:00+00:00",
              "version": null
            }
            """.ReplaceLineEndings("\n"), record.ToJson().ReplaceLineEndings("\n"));
    }

    [Theory]
    [InlineData("[]")]
    [InlineData("{}")]
    [InlineData("""{"id": 1, "pid": 2, "target": "null", "queues": 1, "depth": 64, "size": 512}""")]
    [InlineData("""{"id": -1, "pid": 2, "target": "null", "recipe": {}, "queues": 1, "depth": 64, "size": 512}""")]
    [InlineData("""{"id": 1, "pid": "2", "target": "null", "recipe": {}, "queues": 1, "depth": 64, "size": 512}""")]
    [InlineData("""{"id": 1, "pid": 2, "target": "null", "recipe": {"size": 5}, "queues": 1, "depth": 64, "size": 512}""")]
    [InlineData("""{"id": 1, "pid": 2, "target": "null", "recipe": {}, "queues": 1, "depth": 64, "size": 512, "created": "yesterday"}""")]
    [InlineData("{\"id\": 1,")]
    public void WhatIsNotARecordIsAJsonException(string text)
    {
        Assert.ThrowsAny<JsonException>(() => DeviceRecord.Parse(text));
    }

    [Fact]
    public void ARecordOfAnOlderVersionWithoutOneStillReads()
    {
        // As a daemon before the version was recorded wrote it.
        const string old = """
            {
              "id": 7,
              "pid": 1234,
              "daemonStartTime": 5678,
              "daemonExecutable": "/usr/bin/dotnet",
              "target": "loop",
              "recipe": { "file": "/tmp/disk.img" },
              "queues": 2,
              "depth": 128,
              "size": 67108864,
              "maxIoBytes": 524288,
              "recovery": "reissue",
              "autoclear": false,
              "supervisorPid": 0,
              "created": "2026-12-01T10:00:00+00:00"
            }
            """;
        var record = DeviceRecord.Parse(old);
        Assert.Null(record.Version);
        Assert.Equal("loop", record.Target);
        Assert.Equal("reissue", record.Recovery);
        Assert.Equal("/tmp/disk.img", record.Recipe["file"]);
    }
}
