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
            Metrics = "tcp://127.0.0.1:9560",
            Files = new Dictionary<string, FileIdentity> { ["file"] = new(0x10300000008, 12), ["backing"] = new(2049, ulong.MaxValue) },
        };
        var back = DeviceRecord.Parse(record.ToJson());
        // A record's Recipe and Files are dictionaries: compare them apart from the rest.
        Assert.Equal(record.Recipe, back.Recipe);
        Assert.Equal(record.Files, back.Files);
        Assert.Equal(record with { Recipe = back.Recipe, Files = back.Files }, back);
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
        // Nor the files' identities: nothing to check them against, so a recovery goes ahead.
        Assert.Null(record.Files);
        Assert.Null(record.FilesProblem());
        Assert.Equal("loop", record.Target);
        Assert.Equal("reissue", record.Recovery);
        Assert.Equal("/tmp/disk.img", record.Recipe["file"]);
    }

    // ---- the files a recipe names ----

    [Fact]
    public void FileIdentitiesAreWrittenOnlyWhenThereAreSome()
    {
        var record = new DeviceRecord { Id = 1, Pid = 10, Target = "null", Recipe = new() { ["size"] = "1048576" }, Queues = 1, Depth = 64, Size = 1 << 20 };
        Assert.DoesNotContain("files", record.ToJson(), StringComparison.Ordinal);
        Assert.DoesNotContain("files", (record with { Files = new Dictionary<string, FileIdentity>() }).ToJson(), StringComparison.Ordinal);
        var loop = record with { Target = "loop", Files = new Dictionary<string, FileIdentity> { ["file"] = new(2049, 77) } };
        using var doc = JsonDocument.Parse(loop.ToJson());
        var file = doc.RootElement.GetProperty("files").GetProperty("file");
        Assert.Equal(2049ul, file.GetProperty("dev").GetUInt64());
        Assert.Equal(77ul, file.GetProperty("ino").GetUInt64());
    }

    [Theory]
    [InlineData("""{"id": 1, "pid": 2, "target": "loop", "recipe": {}, "queues": 1, "depth": 64, "size": 512, "files": {"file": {"dev": 1}}}""")]
    [InlineData("""{"id": 1, "pid": 2, "target": "loop", "recipe": {}, "queues": 1, "depth": 64, "size": 512, "files": {"file": 5}}""")]
    [InlineData("""{"id": 1, "pid": 2, "target": "loop", "recipe": {}, "queues": 1, "depth": 64, "size": 512, "files": {"file": {"dev": -1, "ino": 2}}}""")]
    public void BadFileIdentitiesAreNotARecord(string text)
    {
        Assert.ThrowsAny<JsonException>(() => DeviceRecord.Parse(text));
    }

    [Fact]
    public void TheCheckComparesWhatWasRecordedWithWhatThePathNamesNow()
    {
        var was = new FileIdentity(2049, 77);
        Assert.Null(FileIdentity.Mismatch(3, "file", "/srv/disk.img", null, new FileIdentity(1, 1))); // an older record: nothing to compare
        Assert.Null(FileIdentity.Mismatch(3, "file", "/srv/disk.img", was, was));
        var other = FileIdentity.Mismatch(3, "file", "/srv/disk.img", was, new FileIdentity(2049, 78));
        Assert.NotNull(other);
        Assert.Contains("device 3: its file /srv/disk.img is not the file the device was added with (device 8:1 inode 77, now device 8:1 inode 78)", other, StringComparison.Ordinal);
        Assert.Contains("delete the device and add it again", other, StringComparison.Ordinal);
        Assert.Contains("now no regular file", FileIdentity.Mismatch(3, "backing", "/srv/base.img", was, null), StringComparison.Ordinal);
        // Same inode number on another file system is another file.
        Assert.NotNull(FileIdentity.Mismatch(3, "file", "/srv/disk.img", was, new FileIdentity(2050, 77)));
    }

    [Fact]
    public void AFileReplacedUnderItsPathIsRefusedAndTheSameFileIsNot()
    {
        var disk = Path.Combine(_dir.FullName, "disk.img");
        var baseImage = Path.Combine(_dir.FullName, "base.img");
        File.WriteAllBytes(disk, new byte[4096]);
        File.WriteAllBytes(baseImage, new byte[4096]);
        var recipe = new Dictionary<string, string> { ["file"] = disk, ["backing"] = baseImage, ["size"] = "4096" };
        var files = FileIdentity.OfRecipe(recipe);
        Assert.Equal(["backing", "file"], files.Keys.Order());
        var record = new DeviceRecord { Id = 5, Pid = 10, Target = "cow", Recipe = recipe, Queues = 1, Depth = 64, Size = 4096, Files = files };
        record = DeviceRecord.Parse(record.ToJson());
        Assert.Null(record.FilesProblem());
        // Written in place: still the same file.
        File.WriteAllBytes(disk, new byte[8192]);
        Assert.Null(record.FilesProblem());
        // Another file renamed over the path (as an editor or a restore from backup would).
        var other = Path.Combine(_dir.FullName, "other.img");
        File.WriteAllBytes(other, new byte[4096]);
        File.Move(other, baseImage, overwrite: true);
        var problem = record.FilesProblem();
        Assert.NotNull(problem);
        Assert.Contains($"device 5: its backing {baseImage} is not the file the device was added with", problem, StringComparison.Ordinal);
        File.Delete(baseImage);
        Assert.Contains("now no regular file", record.FilesProblem(), StringComparison.Ordinal);
    }

    // ---- who may have written a recipe ----

    [Fact]
    public void TheOwnerAndModeRuleIsTheStateDirectorysOne()
    {
        const uint file = 0x8000;
        Assert.Null(StateDirectory.FileProblem("/run/ublksharp/1.json", 0, file | 0x180, 0));        // root's, 0600
        Assert.Null(StateDirectory.FileProblem("/run/ublksharp/1.json", 0, file | 0x1a4, 0));        // root's, 0644: readable is fine
        Assert.Null(StateDirectory.FileProblem("/tmp/run/1.json", 1000, file | 0x180, 1000));        // the user's own, for a user's run dir
        Assert.Contains("belongs to uid 1000, not to root;", StateDirectory.FileProblem("/run/ublksharp/1.json", 1000, file | 0x180, 0), StringComparison.Ordinal);
        Assert.Contains("group or others may write to it (mode 620)", StateDirectory.FileProblem("/run/ublksharp/1.json", 0, file | 0x190, 0), StringComparison.Ordinal);
        Assert.Contains("(mode 602)", StateDirectory.FileProblem("/run/ublksharp/1.json", 0, file | 0x182, 0), StringComparison.Ordinal);
        Assert.Contains("not a regular file", StateDirectory.FileProblem("/run/ublksharp/1.json", 0, 0xa000 | 0x1ff, 0), StringComparison.Ordinal); // a symlink
    }

    [Fact]
    public void ARecipeOthersMayWriteIsRefusedOnTheFileRead()
    {
        var path = Path.Combine(_dir.FullName, "1.json");
        StateDirectory.WriteAtomically(path, "{}");
        Assert.Equal("{}", StateDirectory.ReadVerified(path));
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.GroupWrite);
        var e = Assert.Throws<UnsafeStateFileException>(() => StateDirectory.ReadVerified(path));
        Assert.Contains($"refusing {path}: group or others may write to it", e.Message, StringComparison.Ordinal);
        Assert.Throws<FileNotFoundException>(() => StateDirectory.ReadVerified(Path.Combine(_dir.FullName, "2.json")));
    }

    [Fact]
    public void ARecipeOfAnotherUserIsRefused()
    {
        Assert.SkipUnless(UblkSharp.Interop.Processes.IsRoot, "giving a file to another user needs root");
        var path = Path.Combine(_dir.FullName, "1.json");
        StateDirectory.WriteAtomically(path, "{}");
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite);
        var chown = System.Diagnostics.Process.Start("chown", ["65534", path])!;
        Assert.True(chown.WaitForExit(30_000) && chown.ExitCode == 0, "chown failed");
        var e = Assert.Throws<UnsafeStateFileException>(() => StateDirectory.ReadVerified(path));
        Assert.Contains("belongs to uid 65534, not to root", e.Message, StringComparison.Ordinal);
    }
}
