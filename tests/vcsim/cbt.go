package main

// Changed Block Tracking for the simulator.
//
// The tests write one change log per disk, <cbt-dir>/<vm instance uuid>/<disk key>.log,
// one line "offset length" (decimal bytes) per write. CreateSnapshot_Task sets each
// disk's backing.changeId to "<backing uuid>/<N>", N being the number of lines in
// its log at that moment, and QueryChangedDiskAreas(snapshot, key, start, "<uuid>/<M>")
// returns the merged union of log lines [M, N) (or, for "*", the allocated areas of
// the -flat.vmdk), at most -cbt-page areas per call, as vSphere pages them.
//
// Control files next to the log:
//   <key>.refuse  (content "FileFault" or "InvalidArgument"): any non-"*" query fails so;
//   <key>.nocbt   the disk does not track changes: empty changeId, every query fails.
//
// Dispatch: the simulator's VirtualMachine type cannot be wrapped in the registry
// (the simulator type-asserts *simulator.VirtualMachine everywhere), so /sdk requests
// for QueryChangedDiskAreas are rewritten to target a per-VM shadow object
// ("ConnectorCbtVirtualMachine:cbt-<vm moref value>") that implements the method. The
// rewrite is an HTTP handler registered with a host-specific ServeMux pattern, which
// takes precedence over the simulator's own "/sdk" pattern.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/google/uuid"
	"github.com/vmware/govmomi/object"
	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/methods"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/soap"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	shadowType   = "ConnectorCbtVirtualMachine"
	shadowPrefix = "cbt-"
	seekData     = 3 // SEEK_DATA
	seekHole     = 4 // SEEK_HOLE
	maxBody      = 16 << 20
)

// diskState is what a snapshot recorded about one disk when it was taken.
type diskState struct {
	key       int32
	uuid      string
	end       int  // number of change-log lines at snapshot time
	tracked   bool // a changeId was issued
	fileName  string
	localFlat string
	capacity  int64
}

type snapRecord struct {
	vm    types.ManagedObjectReference
	disks map[int32]diskState
}

type cbt struct {
	dir  string
	page int

	mu    sync.Mutex
	snaps map[types.ManagedObjectReference]*snapRecord

	svc *simulator.Service
}

func newCBT(dir string, page int) *cbt {
	return &cbt{dir: dir, page: page, snaps: make(map[types.ManagedObjectReference]*snapRecord)}
}

// install registers the registry hook and the /sdk request rewriter. Call it after
// model.Create and before Service.NewServer.
func (c *cbt) install(svc *simulator.Service) {
	c.svc = svc
	for _, e := range simulator.Map.All("VirtualMachine") {
		if vm, ok := e.(*simulator.VirtualMachine); ok {
			c.prepareDisks(&vm.VirtualMachine)
		}
	}
	simulator.Map.AddHandler(&hook{c: c})

	if svc.ServeMux == nil {
		svc.ServeMux = http.NewServeMux()
	}
	for _, host := range []string{"127.0.0.1", "localhost"} {
		svc.ServeMux.HandleFunc(host+"/sdk", c.serveSDK)
		svc.ServeMux.HandleFunc(host+"/sdk/vimService", c.serveSDK)
	}
}

// --- request rewriting -------------------------------------------------------

var (
	qcdaMethod = regexp.MustCompile(`<(?:[A-Za-z_][\w.-]*:)?QueryChangedDiskAreas[\s>/]`)
	thisVM     = regexp.MustCompile(`(<(?:[A-Za-z_][\w.-]*:)?_this\b[^>]*\btype=")VirtualMachine("[^>]*>\s*)([^<\s]+)`)
)

func (c *cbt) serveSDK(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
		_ = r.Body.Close()
		if err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		if qcdaMethod.Match(body) {
			if m := thisVM.FindSubmatch(body); m != nil {
				c.ensureShadow(string(m[3]))
				body = thisVM.ReplaceAll(body, []byte("${1}"+shadowType+"${2}"+shadowPrefix+"${3}"))
			}
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
	}
	c.svc.ServeSDK(w, r)
}

// shadowVM receives the QueryChangedDiskAreas calls made on one VirtualMachine.
// Its moref is {shadowType, "cbt-" + vm value}: a value distinct from the VM's, since
// PropertyCollector.Fetch resolves "ManagedEntity" refs by value alone. The embedded
// mo type is required: the simulator's SearchIndex runs getManagedObject over every
// registered object and panics on one without it.
type shadowVM struct {
	mo.ExtensibleManagedObject

	vm types.ManagedObjectReference
	c  *cbt
}

func (c *cbt) ensureShadow(value string) {
	vmRef := types.ManagedObjectReference{Type: "VirtualMachine", Value: value}
	ref := types.ManagedObjectReference{Type: shadowType, Value: shadowPrefix + value}
	c.mu.Lock()
	defer c.mu.Unlock()
	if simulator.Map.Get(ref) != nil {
		return
	}
	if _, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine); !ok {
		return // the dispatcher answers ManagedObjectNotFound
	}
	shadow := &shadowVM{vm: vmRef, c: c}
	shadow.Self = ref
	simulator.Map.Put(shadow)
}

func (s *shadowVM) QueryChangedDiskAreas(_ *simulator.Context, req *types.QueryChangedDiskAreas) soap.HasFault {
	body := &methods.QueryChangedDiskAreasBody{}
	info, msg, fault := s.c.query(s.vm, req)
	if fault != nil {
		body.Fault_ = simulator.Fault(msg, fault)
		return body
	}
	body.Res = &types.QueryChangedDiskAreasResponse{Returnval: *info}
	return body
}

// --- registry hook -------------------------------------------------------------

type hook struct{ c *cbt }

func (h *hook) Reference() types.ManagedObjectReference {
	return types.ManagedObjectReference{Type: "ConnectorCbtHook", Value: "connector-cbt-hook"}
}

func (h *hook) PutObject(o mo.Reference) {
	if snap, ok := o.(*simulator.VirtualMachineSnapshot); ok {
		h.c.onSnapshot(snap)
	}
}

func (h *hook) UpdateObject(o mo.Reference, changes []types.PropertyChange) {
	vm, ok := o.(*mo.VirtualMachine)
	if !ok {
		return
	}
	for _, ch := range changes {
		if ch.Name == "config.hardware.device" || ch.Name == "config" {
			h.c.prepareDisks(vm)
			return
		}
	}
}

func (h *hook) RemoveObject(ref types.ManagedObjectReference) {
	if ref.Type == "VirtualMachineSnapshot" {
		h.c.mu.Lock()
		delete(h.c.snaps, ref)
		h.c.mu.Unlock()
	}
}

// prepareDisks gives each flat disk a stable backing uuid and a sparse -flat.vmdk
// of its capacity (the simulator creates a 0-byte file). Runs under the VM's lock.
func (c *cbt) prepareDisks(vm *mo.VirtualMachine) {
	if vm.Config == nil {
		return
	}
	for _, dev := range vm.Config.Hardware.Device {
		disk, b, ok := flatDisk(dev)
		if !ok {
			continue
		}
		if b.Uuid == "" && vm.Config.InstanceUuid != "" {
			b.Uuid = stableDiskUUID(vm.Config.InstanceUuid, disk.Key)
		}
		flat, ok := localFlatPath(b.FileName)
		if !ok {
			continue
		}
		st, err := os.Stat(flat)
		if err != nil {
			continue
		}
		if capacity := diskCapacity(disk); st.Size() < capacity {
			if err := os.Truncate(flat, capacity); err != nil {
				log.Printf("cbt: extending %s: %v", flat, err)
			}
		}
	}
}

// onSnapshot runs inside CreateSnapshot_Task, under the VM's lock, right after the
// snapshot object is registered (its Config is a shallow copy of the VM's).
func (c *cbt) onSnapshot(snap *simulator.VirtualMachineSnapshot) {
	vm, ok := simulator.Map.Get(snap.Vm).(*simulator.VirtualMachine)
	if !ok || vm.Config == nil {
		return
	}
	vmUUID := vm.Config.InstanceUuid
	vmCBT := isTrue(vm.Config.ChangeTrackingEnabled)
	rec := &snapRecord{vm: snap.Vm, disks: make(map[int32]diskState)}

	// Give the snapshot its own copies of the disks so that its changeIds stay
	// those of its creation time when a later snapshot advances the VM's.
	devices := make([]types.BaseVirtualDevice, len(vm.Config.Hardware.Device))
	for i, dev := range vm.Config.Hardware.Device {
		devices[i] = dev
		disk, b, ok := flatDisk(dev)
		if !ok {
			continue
		}
		if b.Uuid == "" {
			b.Uuid = stableDiskUUID(vmUUID, disk.Key)
		}
		st := diskState{
			key:      disk.Key,
			uuid:     b.Uuid,
			fileName: b.FileName,
			capacity: diskCapacity(disk),
		}
		st.localFlat, _ = localFlatPath(b.FileName)
		changeID := ""
		if vmCBT && !c.exists(vmUUID, disk.Key, "nocbt") {
			n, err := c.countLines(vmUUID, disk.Key)
			if err != nil {
				log.Printf("cbt: %v", err)
			} else {
				st.end, st.tracked = n, true
				changeID = fmt.Sprintf("%s/%d", b.Uuid, n)
			}
		}
		b.ChangeId = changeID
		rec.disks[disk.Key] = st

		diskCopy := *disk
		backingCopy := *b
		diskCopy.Backing = &backingCopy
		devices[i] = &diskCopy
	}
	snap.Config.Hardware.Device = devices

	c.mu.Lock()
	c.snaps[snap.Self] = rec
	c.mu.Unlock()
}

// --- QueryChangedDiskAreas ------------------------------------------------------

type extent struct{ start, end int64 }

func (c *cbt) query(vmRef types.ManagedObjectReference, req *types.QueryChangedDiskAreas) (*types.DiskChangeInfo, string, types.BaseMethodFault) {
	var (
		st     diskState
		vmUUID string
		vmCBT  bool
		msg    string
		fault  types.BaseMethodFault
	)
	simulator.Map.WithLock(vmRef, func() {
		vm, ok := simulator.Map.Get(vmRef).(*simulator.VirtualMachine)
		if !ok || vm.Config == nil {
			msg, fault = "vm not found", &types.ManagedObjectNotFound{Obj: vmRef}
			return
		}
		vmUUID = vm.Config.InstanceUuid
		vmCBT = isTrue(vm.Config.ChangeTrackingEnabled)
		if req.Snapshot == nil {
			// vSphere then uses the VM's current state (valid for powered-off VMs).
			for _, dev := range vm.Config.Hardware.Device {
				disk, b, ok := flatDisk(dev)
				if !ok || disk.Key != req.DeviceKey {
					continue
				}
				st = diskState{key: disk.Key, uuid: b.Uuid, fileName: b.FileName, capacity: diskCapacity(disk)}
				st.localFlat, _ = localFlatPath(b.FileName)
				if n, err := c.countLines(vmUUID, disk.Key); err == nil && b.ChangeId != "" {
					st.end, st.tracked = n, true
				}
				return
			}
			msg, fault = "no disk with this key", &types.InvalidArgument{InvalidProperty: "deviceKey"}
			return
		}
		c.mu.Lock()
		rec, ok := c.snaps[*req.Snapshot]
		c.mu.Unlock()
		switch {
		case !ok:
			msg, fault = "snapshot not found", &types.ManagedObjectNotFound{Obj: *req.Snapshot}
		case rec.vm != vmRef:
			msg, fault = "snapshot of another vm", &types.InvalidArgument{InvalidProperty: "snapshot"}
		default:
			if st, ok = rec.disks[req.DeviceKey]; !ok {
				msg, fault = "no disk with this key", &types.InvalidArgument{InvalidProperty: "deviceKey"}
			}
		}
	})
	if fault != nil {
		return nil, msg, fault
	}

	fileFault := &types.FileFault{File: st.fileName}
	if !vmCBT || !st.tracked || c.exists(vmUUID, st.key, "nocbt") {
		return nil, "change tracking is not enabled on this disk", fileFault
	}
	if req.StartOffset < 0 || req.StartOffset >= st.capacity {
		return nil, "startOffset out of range", &types.InvalidArgument{InvalidProperty: "startOffset"}
	}

	var areas []extent
	if req.ChangeId == "*" {
		var err error
		if areas, err = allocatedExtents(st.localFlat, st.capacity); err != nil {
			return nil, err.Error(), fileFault
		}
	} else {
		if kind, refused := c.refusal(vmUUID, st.key); refused {
			if kind == "FileFault" {
				return nil, "change tracking data is unavailable", fileFault
			}
			return nil, "changeId is invalid", &types.InvalidArgument{InvalidProperty: "changeId"}
		}
		m, ok := parseChangeID(req.ChangeId, st.uuid)
		if !ok || m > st.end {
			return nil, "changeId is invalid", &types.InvalidArgument{InvalidProperty: "changeId"}
		}
		var err error
		if areas, err = c.logExtents(vmUUID, st.key, m, st.end, st.capacity); err != nil {
			return nil, err.Error(), &types.SystemError{Reason: err.Error()}
		}
	}
	info := page(areas, req.StartOffset, st.capacity, c.page)
	return &info, "", nil
}

// page returns the areas at or after start, at most limit of them; Length reaches the
// end of the last one returned, or the capacity when nothing is left after them.
func page(areas []extent, start, capacity int64, limit int) types.DiskChangeInfo {
	var left []extent
	for _, a := range areas {
		if a.end <= start {
			continue
		}
		if a.start < start {
			a.start = start
		}
		left = append(left, a)
	}
	info := types.DiskChangeInfo{StartOffset: start, Length: capacity - start}
	if len(left) > limit {
		left = left[:limit]
		info.Length = left[limit-1].end - start
	}
	for _, a := range left {
		info.ChangedArea = append(info.ChangedArea, types.DiskChangeExtent{Start: a.start, Length: a.end - a.start})
	}
	return info
}

func parseChangeID(id, diskUUID string) (int, bool) {
	i := strings.LastIndexByte(id, '/')
	if i < 0 || id[:i] != diskUUID {
		return 0, false
	}
	m, err := strconv.Atoi(id[i+1:])
	if err != nil || m < 0 {
		return 0, false
	}
	return m, true
}

// allocatedExtents lists the data (non-hole) ranges of a sparse file, clipped to capacity.
func allocatedExtents(path string, capacity int64) ([]extent, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	limit := fi.Size()
	if capacity < limit {
		limit = capacity
	}
	var out []extent
	for off := int64(0); off < limit; {
		data, err := f.Seek(off, seekData)
		if errors.Is(err, syscall.ENXIO) {
			break
		} else if err != nil {
			return nil, err
		}
		if data >= limit {
			break
		}
		hole, err := f.Seek(data, seekHole)
		if err != nil {
			return nil, err
		}
		if hole > limit {
			hole = limit
		}
		out = append(out, extent{data, hole})
		off = hole
	}
	return out, nil
}

// logExtents returns the merged union of change-log lines [from, to), clipped to capacity.
func (c *cbt) logExtents(vmUUID string, key int32, from, to int, capacity int64) ([]extent, error) {
	lines, err := c.readLog(vmUUID, key)
	if err != nil {
		return nil, err
	}
	if to > len(lines) {
		return nil, fmt.Errorf("change log of disk %d has %d lines, snapshot saw %d", key, len(lines), to)
	}
	var areas []extent
	for _, line := range lines[from:to] {
		fields := strings.Fields(line)
		if len(fields) != 2 {
			return nil, fmt.Errorf("bad change log line %q", line)
		}
		off, err1 := strconv.ParseInt(fields[0], 10, 64)
		n, err2 := strconv.ParseInt(fields[1], 10, 64)
		if err1 != nil || err2 != nil || off < 0 || n < 0 {
			return nil, fmt.Errorf("bad change log line %q", line)
		}
		end := off + n
		if end > capacity {
			end = capacity
		}
		if off < end {
			areas = append(areas, extent{off, end})
		}
	}
	return merge(areas), nil
}

func merge(areas []extent) []extent {
	sort.Slice(areas, func(i, j int) bool { return areas[i].start < areas[j].start })
	var out []extent
	for _, a := range areas {
		if n := len(out); n > 0 && a.start <= out[n-1].end {
			if a.end > out[n-1].end {
				out[n-1].end = a.end
			}
			continue
		}
		out = append(out, a)
	}
	return out
}

// --- files ------------------------------------------------------------------------

func (c *cbt) diskFile(vmUUID string, key int32, ext string) string {
	return filepath.Join(c.dir, vmUUID, fmt.Sprintf("%d.%s", key, ext))
}

func (c *cbt) exists(vmUUID string, key int32, ext string) bool {
	_, err := os.Stat(c.diskFile(vmUUID, key, ext))
	return err == nil
}

func (c *cbt) refusal(vmUUID string, key int32) (string, bool) {
	data, err := os.ReadFile(c.diskFile(vmUUID, key, "refuse"))
	if err != nil {
		return "", false
	}
	return strings.TrimSpace(string(data)), true
}

func (c *cbt) readLog(vmUUID string, key int32) ([]string, error) {
	f, err := os.Open(c.diskFile(vmUUID, key, "log"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	defer f.Close()
	var lines []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" {
			lines = append(lines, line)
		}
	}
	return lines, sc.Err()
}

func (c *cbt) countLines(vmUUID string, key int32) (int, error) {
	lines, err := c.readLog(vmUUID, key)
	return len(lines), err
}

// --- helpers -------------------------------------------------------------------

func flatDisk(dev types.BaseVirtualDevice) (*types.VirtualDisk, *types.VirtualDiskFlatVer2BackingInfo, bool) {
	disk, ok := dev.(*types.VirtualDisk)
	if !ok {
		return nil, nil, false
	}
	b, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
	return disk, b, ok
}

func diskCapacity(disk *types.VirtualDisk) int64 {
	if disk.CapacityInBytes > 0 {
		return disk.CapacityInBytes
	}
	return disk.CapacityInKB * 1024
}

func stableDiskUUID(vmUUID string, key int32) string {
	return uuid.NewSHA1(uuid.NameSpaceOID, []byte(fmt.Sprintf("connector-vcsim/%s/%d", vmUUID, key))).String()
}

// localFlatPath maps "[ds] dir/name.vmdk" to the local path of dir/name-flat.vmdk.
func localFlatPath(fileName string) (string, bool) {
	var p object.DatastorePath
	if !p.FromString(fileName) || p.Path == "" {
		return "", false
	}
	for _, e := range simulator.Map.All("Datastore") {
		ds, ok := e.(*simulator.Datastore)
		if !ok || ds.Name != p.Datastore {
			continue
		}
		local := filepath.Join(ds.Info.GetDatastoreInfo().Url, p.Path)
		return strings.Replace(local, ".vmdk", "-flat.vmdk", 1), true
	}
	return "", false
}

func isTrue(b *bool) bool { return b != nil && *b }
