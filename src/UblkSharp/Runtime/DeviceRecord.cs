using System.Text.Json;
using System.Text.Json.Serialization;

namespace UblkSharp.Runtime;

/// <summary>
/// What a daemon records about the device it serves, in /run/ublksharp/ID.json: the target and its
/// recipe (enough to rebuild it) and the daemon's pid. Written atomically (temp file, then rename),
/// so a reader never sees half a record.
/// </summary>
public sealed record DeviceRecord
{
    public static string Directory { get; set; } = Environment.GetEnvironmentVariable("UBLKSHARP_RUN_DIR") ?? "/run/ublksharp";

    public required uint Id { get; init; }

    public required int Pid { get; init; }

    public required string Target { get; init; }

    public required Dictionary<string, string> Recipe { get; init; }

    public required int Queues { get; init; }

    public required int Depth { get; init; }

    public required long Size { get; init; }

    public int MaxIoBytes { get; init; } = 512 * 1024;

    /// <summary>off, on, reissue or fail-io (see <see cref="RecoveryMode"/>).</summary>
    public string Recovery { get; init; } = "off";

    public bool Autoclear { get; init; }

    /// <summary>The supervising process that recovers the device when the daemon dies, if any.</summary>
    public int SupervisorPid { get; init; }

    public DateTimeOffset Created { get; init; } = DateTimeOffset.UtcNow;

    /// <summary>The record of a device this process serves: its shape and recovery mode as the kernel reports them.</summary>
    public static DeviceRecord Of(UblkDevice device, string target, Dictionary<string, string> recipe, long size)
    {
        ArgumentNullException.ThrowIfNull(device);
        return new DeviceRecord
        {
            Id = device.Id,
            Pid = Environment.ProcessId,
            Target = target,
            Recipe = recipe,
            Queues = device.Info.nr_hw_queues,
            Depth = device.Info.queue_depth,
            Size = size,
            MaxIoBytes = (int)device.Info.max_io_buf_bytes,
            Recovery = RecoveryModes.FromFlags((Ublk.UblkFeatures)device.Info.flags).Name(),
        };
    }

    public static string PathFor(uint id) => System.IO.Path.Combine(Directory, $"{id}.json");

    public void Save()
    {
        System.IO.Directory.CreateDirectory(Directory);
        var path = PathFor(Id);
        var tmp = path + $".tmp{Environment.ProcessId}";
        File.WriteAllText(tmp, JsonSerializer.Serialize(this, DeviceRecordJson.Default.DeviceRecord));
        File.Move(tmp, path, overwrite: true);
    }

    /// <summary>The record of device <paramref name="id"/>, or null if there is none (or it is unreadable).</summary>
    public static DeviceRecord? Load(uint id)
    {
        try
        {
            return JsonSerializer.Deserialize(File.ReadAllText(PathFor(id)), DeviceRecordJson.Default.DeviceRecord);
        }
        catch (Exception e) when (e is IOException or JsonException or UnauthorizedAccessException)
        {
            return null;
        }
    }

    public static void Remove(uint id)
    {
        try
        {
            File.Delete(PathFor(id));
        }
        catch (IOException)
        {
        }
    }
}

[JsonSourceGenerationOptions(WriteIndented = true, PropertyNamingPolicy = JsonKnownNamingPolicy.CamelCase)]
[JsonSerializable(typeof(DeviceRecord))]
internal sealed partial class DeviceRecordJson : JsonSerializerContext;
