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
        var text = JsonSerializer.Serialize(record, DeviceRecordJson.Default.DeviceRecord);
        using (var doc = JsonDocument.Parse(text))
        {
            Assert.Equal("1.2.3+abc", doc.RootElement.GetProperty("version").GetString());
        }
        Assert.Equal("1.2.3+abc", JsonSerializer.Deserialize(text, DeviceRecordJson.Default.DeviceRecord)!.Version);
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
        var record = JsonSerializer.Deserialize(old, DeviceRecordJson.Default.DeviceRecord)!;
        Assert.Null(record.Version);
        Assert.Equal("loop", record.Target);
        Assert.Equal("reissue", record.Recovery);
        Assert.Equal("/tmp/disk.img", record.Recipe["file"]);
    }
}
